"""How results read: rich tables and the text formats (display.py), the figures (figures.py)."""
