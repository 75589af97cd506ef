"""Black-box teachers: models kdforge sees only through the class probabilities they return for inputs."""
