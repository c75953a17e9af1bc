"""Console entry points: megamoe-train, megamoe-quickstart."""
