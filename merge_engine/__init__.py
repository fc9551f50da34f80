"""sdmerge's merge engine: plan, stream and write Stable Diffusion checkpoint merges.

A pure library (torch and safetensors, never web, database or queue code). Importing this
package is cheap: the heavy modules are imported where they are used.
"""

__version__ = "0.1.0"
