"""The `tbcm` command: wires models/, distill/ and service/ together; holds no logic of its own."""
