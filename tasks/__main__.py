"""`python -m tasks` was the stage command line; it is `python -m pipeline` now. Says so and stops."""
import sys

if __name__ == "__main__":
    args = " ".join(sys.argv[1:]) or "run STAGE"
    print(f"error: `python -m tasks` is now `python -m pipeline`: run `python -m pipeline {args}`", file=sys.stderr)
    sys.exit(2)
