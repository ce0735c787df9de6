"""Help texts of flags that several subcommands share (argparse only: `anyquant --help` stays light)."""

ENFORCE_EAGER_HELP = (
    "run every step eagerly: skip compiling the decode step with torch.compile at load "
    "(vLLM's flag; the environment variable ANYQUANT_ENFORCE_EAGER=1 does the same)"
)
