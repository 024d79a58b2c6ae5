"""`python -m mlx_falcon_h1.quantize`: the converter's command with -q and a --method.

The command is the converter's (mlx_falcon_h1_convert.convert.quantize_main);
this script only runs it. Nothing in the package imports this file.
"""

from mlx_falcon_h1_convert.convert import quantize_main

quantize_main()
