"""Builders that turn real downloads (and user tables) into stil datasets."""
