"""The agents' outside systems, one module per backend, each behind the small interface its role defines."""
