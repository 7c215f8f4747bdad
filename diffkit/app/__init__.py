"""The Gradio demo (``python app.py``): every diffkit feature in one page, compared side by side.

:mod:`~diffkit.app.settings` validates form values, :mod:`~diffkit.app.logic` runs requests on the shared
model, :mod:`~diffkit.app.ui` lays out the page and :mod:`~diffkit.app.main` is the command line.
"""
