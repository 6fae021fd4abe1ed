"""The Gradio UI's pieces, laid out by app.py's `build_demo`: handlers of the Arena (arena.py) and Progress
(progress.py) tabs, the API, Data and Admin handlers and the HTTP edge (api.py), shared plumbing (common.py) and the
page's CSS and scripts (assets.py). Like app.py, these may import every other package; nothing imports them but
app.py (tests/test_import_rules.py)."""
