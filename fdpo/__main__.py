"""`python -m fdpo ...` (and `accelerate launch -m fdpo train RECIPE`)."""

from fdpo.cli import main

if __name__ == "__main__":
    main()
