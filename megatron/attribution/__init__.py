"""Attribution search over the pretraining data: an exact span locator and a membership sketch over token
n-grams of preprocessed datasets, with each document's source metadata. See docs/attribution.md.
"""
