"""Data in: images and their transforms (images.py), a dataset versioned by a manifest of its files
(manifest.py), segmentation image/mask pairs (segmentation.py), the embedded digit scenes
(scenes.py), and the loaders that feed training and evaluation (loaders.py)."""
