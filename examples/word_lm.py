"""A word-level LSTM language model (Embedding -> Dropout -> LSTM -> Dropout -> Linear), as in
PyTorch's word_language_model example; the model the LSTM passes are shown on.

    fxreduce apply examples/word_lm.py:word_language_model --pipeline decompose_lstm --input-shape N,T:long
"""

import torch


class WordLanguageModel(torch.nn.Module):
    def __init__(self, vocabulary: int = 2000, embedding: int = 200, hidden: int = 200, layers: int = 2,
                 dropout: float = 0.5):
        super().__init__()
        self.embed = torch.nn.Embedding(vocabulary, embedding)
        self.drop_in = torch.nn.Dropout(dropout)
        self.lstm = torch.nn.LSTM(embedding, hidden, layers, dropout=dropout, batch_first=True)
        self.drop_out = torch.nn.Dropout(dropout)
        self.decoder = torch.nn.Linear(hidden, vocabulary)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        output, _ = self.lstm(self.drop_in(self.embed(tokens)))
        return self.decoder(self.drop_out(output))


def word_language_model() -> WordLanguageModel:
    torch.manual_seed(0)
    return WordLanguageModel().eval()
