"""Upstream dialects: what one kind of upstream account needs changed in a request, and nothing more."""
