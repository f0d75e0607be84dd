"""The bundled demo model's world: synthetic scenes, questions, and the script that trains it."""
