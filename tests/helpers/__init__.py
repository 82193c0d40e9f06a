"""Helpers the tests share: clip generators, local servers, small caches, a headless browser."""
