"""The style library: versioned prompt templates (library.py: the files, their
validation and approval; render.py: structural rendering of a request)."""
