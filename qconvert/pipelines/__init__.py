"""One pipeline per verb of the API (`qconvert.api` re-exports them)."""
