"""The notebook layer: %%task and %nbqueue (magics.py), live progress views (widgets.py), HTML
renderings of result snapshots (display.py). Imported lazily: the core never imports it;
``nbqueue`` registers its rendering with IPython's display formatters."""
