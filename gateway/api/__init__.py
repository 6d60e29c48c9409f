"""HTTP routes; each module is one group of endpoints."""
