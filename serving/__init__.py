"""Serving: `h2po serve` on Ray Serve (serving/launch.py), its deployment (app.py), the lists it answers with
(lists.py, no Ray) and the try-it page (page.py)."""
