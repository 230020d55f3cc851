"""Local HTTP doubles of documented APIs that no real server can stand in for on this machine."""
