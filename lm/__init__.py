"""The language-model core shared by train, export and serve.

    artifacts  (the on-disk contract)
        ^
       lm      chat encoding, padding, model loading, the supported architectures, adapter rules,
        ^      data formats, evaluation, the verified merge and the ONNX Runtime causal LM
        |
    train  export  serve   (no stage imports another; tests/test_import_contract.py holds the line)

Each rule lives here once, so changing tokenisation, an adapter rule or the ONNX runtime moves
every stage together.
"""
