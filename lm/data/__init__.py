"""Data: read and validate user files into one chat form, clean and split them."""
