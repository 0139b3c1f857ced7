"""Test helpers: small stand-in models built locally, with no network."""
