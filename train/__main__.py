"""python -m train PRESET [--field value ...] (the same as `imfc train`)."""

from train.config import parse_config
from train.loop import train

train(parse_config(prog="python -m train"))
