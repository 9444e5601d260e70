"""llama_fineweb: the library behind the scripts at the top of the repository.

Imported by the scripts (train_llama.py, finetune.py, chat.py, ...), the benchmarks and the tests;
it runs nothing by itself and never imports a script. model.py, at the top, is the layer below it.
"""
