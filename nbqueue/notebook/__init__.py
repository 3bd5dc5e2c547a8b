"""The notebook layer: %%task and %nbqueue (magics.py), live progress views (widgets.py),
HTML reprs (display.py). Imported lazily: the core never imports it."""
