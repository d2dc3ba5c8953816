"""scripts/demo.py's work: a checkpoint and images or videos -> skeleton pictures, 3D views and JSON.

Each image is a hand crop, or holds a hand inside a given box [x, y, w, h] (top-left corner and size in
pixels, edge coordinates as COCO writes them). The crop is the square of side max(w, h) * box_scale about
the box's centre (the whole image, padded to a square, without a box), cut and resized by
geometry.crop_and_rotate and normalised as in training. The model's normalised uvd becomes metres with
the crop's intrinsics and a root depth and size recovered from an assumed hand size
(geometry.root_and_bone_from_uvd, the 2.5D root recovery): the crop only changes the intrinsics, so the
joints are in the original image's camera frame. Left hands are mirrored in (geometry.mirror_lr: the
model knows right hands only) and their prediction mirrored back out.

A video file, a camera (input=0) and a stream URL are read frame by frame through one loop (run.py's
process_video), which measures the frames per second, may smooth the joints across frames (One-Euro) and
stops at the input's end, max_frames or Ctrl-C with what was done written.

inputs.py: the options and reading images, folders, videos, cameras and streams; hand.py: one hand through
the model; outputs.py: the JSON (a video's written as its frames come) and pictures; video.py: the annotated
video (H.264 through PyAV, else OpenCV); smoothing.py: the One-Euro filter; labels.py: the optional 2D error
against keypoint labels; run.py: the run over every input (run_demo).
"""
