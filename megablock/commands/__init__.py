"""The command-line tools (tools/*.py and the console entry points of setup.py run these)."""
