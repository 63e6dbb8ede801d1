"""Chunked KDA (WY/UT form). Placeholder until the chunked implementation lands: falls back to the reference."""

from pallas_kernels.kda.reference import kda_reference


def kda_chunk(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None,
              chunk_size=64):
    return kda_reference(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, segment_ids=segment_ids)
