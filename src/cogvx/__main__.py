"""``python -m cogvx`` (and ``torchrun -m cogvx``, ``accelerate launch -m cogvx``)."""

from cogvx.cli import main

if __name__ == "__main__":
    main()
