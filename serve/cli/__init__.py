"""`imagegen`, the command line: main.py builds the parser; one module per verb
group (serve, generate, models, capacity, bench), each with `add_parser(sub)` and
`run(args) -> int`. Heavy imports (Ray, torch) stay inside `run`."""
