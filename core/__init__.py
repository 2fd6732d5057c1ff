"""The leaf layer: what every other package may import and which imports none of them (torch and numpy only)."""
