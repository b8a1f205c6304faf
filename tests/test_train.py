"""train.py: which settings a command line set explicitly (eval mode holds them against the run
saved in the workdir)."""

import train
from configs import meta, text


def test_explicit_settings_are_the_config_flags_and_an_explicit_variant():
  config = text.get_config("fashion")  # As the flags below leave it.
  config.update(num_epochs=3, mode="eval")
  config.data.manual_dir = "/data"
  argv = ["train.py", "--config=configs/text.py:fashion", "--workdir=W", "--config.num_epochs=3",
          "--config.data.manual_dir=/data", "--config.mode=eval"]
  assert train.explicit_settings(argv, config) == {
      "variant": "fashion", "num_epochs": 3, "data.manual_dir": "/data", "mode": "eval"}
  # The default variant, not named: not explicit, so eval takes the saved run's.
  assert train.explicit_settings(["train.py", "--config=configs/meta.py", "--workdir=W"],
                                 meta.get_config()) == {}
