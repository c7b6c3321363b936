"""Speed and memory against peers, each as a ratio measured in one run (`make bench`)."""
