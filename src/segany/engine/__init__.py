"""Everything between the pure models and the user-facing API: image sources, preprocessing, prompts, segment-everything and results."""
