"""Data: read and validate user files, clean, split, tokenise."""
