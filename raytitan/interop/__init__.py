"""Other checkpoint formats, in and out of raytitan steps: Hugging Face folders, torch files."""
