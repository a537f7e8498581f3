"""kubetune's Kubernetes operator: the only code that talks to the Kubernetes API."""
