"""Tests of the modules every stage shares: file permissions, the Hub client."""
