"""The tools wing: one module per ``nnunetv2-allukan`` command, around nnU-Net and the KA library.

``cli`` (the argument parser) sits on top and imports the commands; ``nnunet_commands`` (finding and running
nnU-Net's commands with our trainers discoverable) sits at the bottom; nothing here is imported by the KA library,
the architectures or the trainers.
"""
