"""One module per CLI command: `add_parser(subparsers, parents)` registers it and sets
`run(args)` as its handler."""
