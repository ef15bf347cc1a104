"""The web UI's pieces; `app.py` is the layout and the wiring.

    outputs.py   what each handler may change, by component name (named tuples)
    views.py     status lines, tables, labels and settings read from the controls (no gradio)
    handlers.py  ExplorerApp: one method per event, each returning its named outputs
"""
