// The dashboard's script. Report: draws the inlined figures. Live page: polls api/state every 1.5 s and, when the
// run wrote something new, redraws the charts with Plotly.react (no reload; zoom is kept) and swaps in the
// summary/details sections. Those come rendered by the server's Jinja2 templates with autoescape on, so any
// text from data (titles, error messages) in them is already escaped; data never reaches innerHTML unescaped.
"use strict";
(function () {
  const PLOTLY_CONFIG = {displaylogo: false, responsive: true};

  function draw(figures) {
    for (const [name, figure] of Object.entries(figures)) {
      const div = document.getElementById("chart-" + name);
      if (div) Plotly.react(div, figure.data, figure.layout, PLOTLY_CONFIG);
    }
  }

  function fill(fragments) {
    for (const [id, escapedHtml] of Object.entries(fragments)) {
      document.getElementById(id).innerHTML = escapedHtml;
    }
  }

  let since = "";
  async function poll() {
    const connection = document.getElementById("connection");
    try {
      const response = await fetch("api/state?since=" + encodeURIComponent(since), {cache: "no-store"});
      if (!response.ok) throw new Error("HTTP " + response.status);
      const state = await response.json();
      if (state.version !== since) {
        draw(state.figures);
        fill(state.html);
        since = state.version;
      }
      connection.textContent = "live · updated " + new Date().toLocaleTimeString();
      connection.className = "connection";
    } catch (err) {
      connection.textContent = "disconnected (" + err.message + "): retrying";
      connection.className = "connection offline";
    }
    setTimeout(poll, 1500);
  }

  const inline = document.getElementById("h2po-figures");
  if (inline) draw(JSON.parse(inline.textContent));
  else poll();
})();
