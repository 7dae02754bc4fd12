"""The site update: its value, its file, its Flower records and the checks every update passes."""
