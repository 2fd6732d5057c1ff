// The try-it page: title completion, the request, and one list per served method. Text from the server is only
// ever set as textContent (never as HTML), so titles with markup show as text.
"use strict";
const choices = JSON.parse(document.getElementById("choices").textContent);
const seeds = new Map();  // item id -> title
const known = new Map();  // title shown in the completion -> item id

function el(tag, text) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  return node;
}

async function complete() {
  const q = document.getElementById("seed-input").value;
  if (q.trim().length < 2) return;
  const response = await fetch("titles?q=" + encodeURIComponent(q), {credentials: "same-origin"});
  if (!response.ok) return;
  const options = document.getElementById("seed-options");
  options.replaceChildren();
  for (const item of await response.json()) {
    known.set(item.title, item.item_id);
    const option = el("option");
    option.value = item.title;
    options.appendChild(option);
  }
}

function showSeeds() {
  const list = document.getElementById("seeds");
  list.replaceChildren();
  for (const [id, title] of seeds) {
    const li = el("li", title);
    const remove = el("button", "\u00d7");
    remove.type = "button";
    remove.title = "remove";
    remove.addEventListener("click", () => { seeds.delete(id); showSeeds(); });
    li.appendChild(remove);
    list.appendChild(li);
  }
}

function addSeed() {
  const input = document.getElementById("seed-input");
  const title = input.value.trim();
  if (!title) return;
  const id = known.get(title);
  seeds.set(id === undefined ? title : id, title);  // an unknown title is sent as typed: the server names it
  input.value = "";
  showSeeds();
}

function request() {
  const constraints = [];
  for (const kind of ["exclude", "require", "prefer"]) {
    const value = document.getElementById(kind + "-value").value;
    if (!value) continue;
    const at = value.indexOf("=");
    const c = {type: kind, field: value.slice(0, at), value: value.slice(at + 1)};
    if (kind === "prefer") c.weight = Number(document.getElementById("prefer-weight").value);
    constraints.push(c);
  }
  const year = document.getElementById("min-year").value;
  if (year) constraints.push({type: "recency", min_year: Number(year)});
  return {seeds: [...seeds.keys()], constraints, k: Number(document.getElementById("k").value || choices.k)};
}

async function fill(column, body) {
  const list = column.querySelector(".list"), error = column.querySelector(".error");
  const meta = column.querySelector(".meta");
  list.replaceChildren();
  error.hidden = true;
  meta.textContent = "asking...";
  const start = performance.now();
  try {
    const response = await fetch(column.dataset.url, {method: "POST", body, credentials: "same-origin",
                                                      headers: {"Content-Type": "application/json"}});
    const answer = await response.json();
    meta.textContent = `${response.status} in ${Math.round(performance.now() - start)} ms`;
    if (!response.ok) throw new Error(answer.error || response.statusText);
    for (const item of answer.items) list.appendChild(el("li", item.title));
  } catch (err) {
    error.textContent = String(err.message || err);
    error.hidden = false;
  }
}

document.getElementById("seed-input").addEventListener("input", complete);
document.getElementById("seed-input").addEventListener("keydown", e => {
  if (e.key === "Enter") { e.preventDefault(); addSeed(); }
});
document.getElementById("seed-add").addEventListener("click", addSeed);
document.getElementById("request").addEventListener("submit", e => {
  e.preventDefault();
  const body = JSON.stringify(request());
  document.body.dataset.pending = "yes";
  Promise.all([...document.querySelectorAll(".column")].map(c => fill(c, body)))
    .finally(() => { document.body.dataset.pending = "no"; });
});
