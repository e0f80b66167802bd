"""Node monitoring: what each running batch job was given and what it really uses."""
