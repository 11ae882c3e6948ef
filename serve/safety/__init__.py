"""Safety: the prompt policy (policy.py over normalise.py); the image classifier and
the review queue come next."""
