"""The stages of the pipeline, one module each: read the inputs, call convheads, write the outputs.
A stage imports the library and the shared pipeline modules, never another stage; pipeline/dag.py
puts them in order."""
