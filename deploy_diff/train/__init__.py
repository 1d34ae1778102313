"""Training room (torch): UNet, data, trainer. Imports ``deploy_diff.runtime``; never imported by it."""
