"""The `tierbase` command line: parse, call one facade/SDK method, render."""
